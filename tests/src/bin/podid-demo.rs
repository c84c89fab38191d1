//! `make demo`: the local demo. Azure (Entra, ARM, the VM's IMDS) is simulated, the cluster is
//! the fake API server, the node and its pods are network namespaces with real iptables, `mic`
//! and `nmi` are the real binaries, and each pod asks for a token with the official Python
//! `azure-identity` SDK.
//!
//! The cluster objects are the files of `deploy/examples/`, applied as a user would apply them;
//! only the values that must point at the simulated Azure (client ids, resource ids, the tenant,
//! the secret) are filled in, and each substitution is printed.
//!
//! Needs root. Leaves nothing behind, Ctrl-C included: namespaces, links and rules live in the
//! node namespace, which is removed on exit.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use podid_e2e::cluster::{Cluster, NODE, pod_get, sdk_for};
use podid_e2e::{SdkOutcome, netns};
use serde_json::{Value, json};

fn step(text: &str) {
    println!("\n==> {text}");
}

struct Row {
    pod: String,
    asked: String,
    expect_token: bool,
    result: String,
}

impl Row {
    fn as_expected(&self) -> bool {
        self.result.starts_with("token") == self.expect_token
    }
}

async fn ask(
    cluster: &Cluster,
    pod: &Arc<netns::SimPod>,
    name: &str,
    client_id: &str,
    label: &str,
    expect_token: bool,
) -> anyhow::Result<Row> {
    let started = Instant::now();
    let result = match sdk_for(pod, client_id).await? {
        SdkOutcome::Token { token, expires_on } => {
            let claims = cluster.cloud.verify_access_token(&token)?;
            format!(
                "token for client {} (expires_on {expires_on}) in {} ms",
                claims.appid,
                started.elapsed().as_millis()
            )
        }
        SdkOutcome::Error { class, message } => {
            format!(
                "refused: {class}: {}",
                message.lines().next().unwrap_or_default()
            )
        }
    };
    Ok(Row {
        pod: name.to_owned(),
        asked: label.to_owned(),
        expect_token,
        result,
    })
}

/// The YAML documents of `deploy/examples/<file>`, as JSON.
fn example(file: &str) -> anyhow::Result<Vec<Value>> {
    let path = podid_e2e::workspace_root()
        .join("deploy/examples")
        .join(file);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = Vec::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(document)
            .with_context(|| format!("parsing {}", path.display()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// The document of `kind` named `name`.
fn find<'a>(docs: &'a mut [Value], kind: &str, name: &str) -> anyhow::Result<&'a mut Value> {
    docs.iter_mut()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} in the examples"))
}

/// Replaces `field` of `doc` (a JSON pointer) and prints the substitution.
fn fill(doc: &mut Value, field: &str, value: &str) -> anyhow::Result<()> {
    let what = format!(
        "{} {}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    );
    let slot = doc
        .pointer_mut(field)
        .with_context(|| format!("{what} has no {field}"))?;
    *slot = json!(value);
    println!("    {what}: {field} = {value}");
    Ok(())
}

/// Creates `doc` on the API server as `kubectl apply` would (for a new object). A Secret's
/// `stringData` is folded into `data` the way the real API server does.
fn apply(cluster: &Cluster, mut doc: Value) -> anyhow::Result<()> {
    if doc["kind"] == "Secret"
        && let Some(Value::Object(strings)) =
            doc.as_object_mut().and_then(|o| o.remove("stringData"))
    {
        let data = doc["data"].as_object().cloned().unwrap_or_default();
        let mut data = data;
        for (key, value) in strings {
            data.insert(
                key,
                json!(STANDARD.encode(value.as_str().unwrap_or_default())),
            );
        }
        doc["data"] = Value::Object(data);
    }
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let name = doc["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let path = match kind.as_str() {
        "Namespace" => "/api/v1/namespaces".to_owned(),
        "Secret" | "Pod" | "ServiceAccount" => format!(
            "/api/v1/namespaces/{namespace}/{}s",
            kind.to_ascii_lowercase()
        ),
        "AzureIdentity" | "AzureIdentityBinding" | "AzurePodIdentityException" => {
            let plural = if kind == "AzureIdentity" {
                "azureidentities".to_owned()
            } else {
                format!("{}s", kind.to_ascii_lowercase())
            };
            format!("/apis/aadpodidentity.k8s.io/v1/namespaces/{namespace}/{plural}")
        }
        other => anyhow::bail!("the demo does not apply {other} objects"),
    };
    cluster
        .create(&path, doc)
        .with_context(|| format!("applying {kind} {namespace}/{name}"))
}

/// A pod object scheduled on the simulated node and running at `ip` (what the scheduler and the
/// kubelet would add).
fn place(mut pod: Value, ip: std::net::Ipv4Addr) -> Value {
    let name = pod["metadata"]["name"].as_str().unwrap_or("pod").to_owned();
    pod["metadata"]["uid"] = json!(format!("uid-{name}"));
    pod["spec"]["nodeName"] = json!(NODE);
    pod["status"] =
        json!({"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]});
    pod
}

/// A minimal pod named `name` in `namespace` with `labels`.
fn pod_object(name: &str, namespace: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "app"}]}
    })
}

async fn run(cluster_slot: &mut Option<Cluster>) -> anyhow::Result<()> {
    step(
        "Simulated cluster and Azure: one node (network namespace), the fake API server, Entra, ARM, the VM's IMDS",
    );
    let cluster = cluster_slot.insert(Cluster::start().await?);
    let log = std::env::var_os("PODID_DEMO_LOG").map_or_else(
        || podid_e2e::workspace_root().join("target/podid-demo.log"),
        std::path::PathBuf::from,
    );
    let _ = std::fs::remove_file(&log);
    cluster.child_log = Some(log.clone());
    println!("    nmi and mic log to {}", log.display());
    let node = Arc::clone(&cluster.node);
    println!(
        "    node {} (namespace {}, {}), API server {}, Entra {}",
        NODE,
        node.name(),
        node.ip(),
        cluster.api.url(),
        cluster.entra_url
    );

    step("Apply deploy/examples/, pointing the placeholders at the simulated Azure");
    let msi = cluster.cloud.add_user_assigned_identity("demo-msi");
    let mut docs = example("azureidentity-msi.yaml")?;
    let identity = find(&mut docs, "AzureIdentity", "demo-msi")?;
    fill(identity, "/spec/resourceID", &msi.resource_id)?;
    fill(identity, "/spec/clientID", &msi.client_id)?;
    let mut objects = docs;

    let sp = cluster.cloud.add_service_principal("demo-sp");
    let secret = cluster.cloud.add_client_secret(&sp.client_id)?;
    let mut docs = example("azureidentity-sp.yaml")?;
    let secret_doc = find(&mut docs, "Secret", "demo-sp-secret")?;
    secret_doc["stringData"]["clientSecret"] = json!(secret);
    println!("    Secret demo-sp-secret: /stringData/clientSecret = (the simulated app's secret)");
    let identity = find(&mut docs, "AzureIdentity", "demo-sp")?;
    fill(identity, "/spec/tenantID", cluster.cloud.tenant_id())?;
    fill(identity, "/spec/clientID", &sp.client_id)?;
    identity["spec"]["adEndpoint"] = json!(cluster.entra_url);
    println!(
        "    AzureIdentity demo-sp: /spec/adEndpoint = {} (the simulated Entra)",
        cluster.entra_url
    );
    objects.extend(docs);

    let team = cluster.cloud.add_user_assigned_identity("team-a-id");
    let mut docs = example("namespaced-identity.yaml")?;
    let identity = find(&mut docs, "AzureIdentity", "team-a-id")?;
    fill(identity, "/spec/resourceID", &team.resource_id)?;
    fill(identity, "/spec/clientID", &team.client_id)?;
    objects.extend(docs);
    objects.extend(example("exception.yaml")?);

    // Pods run as network namespaces; their objects come from the examples where there is one.
    let mut pods = Vec::new();
    for doc in objects {
        if doc["kind"] == "Pod" {
            pods.push(doc);
        } else {
            println!(
                "    apply {} {}/{}",
                doc["kind"].as_str().unwrap_or("?"),
                doc["metadata"]["namespace"].as_str().unwrap_or("-"),
                doc["metadata"]["name"].as_str().unwrap_or("?")
            );
            apply(cluster, doc)?;
        }
    }
    pods.extend(example("demo-pod.yaml")?);
    pods.push(pod_object(
        "sp-app",
        "default",
        json!({"aadpodidbinding": "demo-sp"}),
    ));
    pods.push(pod_object(
        "agent",
        "monitoring",
        json!({"app": "monitoring-agent"}),
    ));
    pods.push(pod_object(
        "intruder",
        "default",
        json!({"aadpodidbinding": "team-a"}),
    ));
    pods.push(pod_object("lonely", "default", json!({})));

    step("Pods (each a network namespace behind the node's bridge)");
    let mut sims = std::collections::HashMap::new();
    for pod in pods {
        let name = pod["metadata"]["name"].as_str().unwrap_or("pod").to_owned();
        let sim = Arc::new(node.add_pod(&name)?);
        println!(
            "    {:<11} {:<15} {}/{} labels {}",
            name,
            sim.ip().to_string(),
            pod["metadata"]["namespace"].as_str().unwrap_or("default"),
            name,
            pod["metadata"]["labels"]
        );
        apply(cluster, place(pod, sim.ip()))?;
        sims.insert(name, sim);
    }
    let pod = |name: &str| -> anyhow::Result<Arc<netns::SimPod>> {
        sims.get(name)
            .cloned()
            .with_context(|| format!("no pod {name}"))
    };

    step(
        "Start the real mic (host) and nmi (inside the node; it installs the aad-metadata interception)",
    );
    cluster.spawn_mic()?;
    cluster.spawn_nmi(&[])?;
    cluster.wait_ready().await?;
    for line in cluster.chain()? {
        println!("    {line}");
    }

    step("Each pod runs azure-identity's ManagedIdentityCredential against 169.254.169.254");
    let cluster = &*cluster;
    let rows = vec![
        ask(
            cluster,
            &pod("demo")?,
            "demo",
            &msi.client_id,
            "demo-msi (type 0)",
            true,
        )
        .await?,
        ask(
            cluster,
            &pod("sp-app")?,
            "sp-app",
            &sp.client_id,
            "demo-sp (type 1)",
            true,
        )
        .await?,
        ask(
            cluster,
            &pod("team-a-app")?,
            "team-a-app",
            &team.client_id,
            "team-a-id (namespaced)",
            true,
        )
        .await?,
        ask(
            cluster,
            &pod("agent")?,
            "agent",
            &msi.client_id,
            "demo-msi (exception: the node's IMDS)",
            true,
        )
        .await?,
        ask(
            cluster,
            &pod("demo")?,
            "demo",
            &sp.client_id,
            "demo-sp (not its own)",
            false,
        )
        .await?,
        ask(
            cluster,
            &pod("intruder")?,
            "intruder",
            &team.client_id,
            "team-a-id (other namespace)",
            false,
        )
        .await?,
    ];
    println!();
    println!("    {:<11} {:<38} result", "pod", "identity asked");
    for row in &rows {
        println!("    {:<11} {:<38} {}", row.pod, row.asked, row.result);
    }
    let path =
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";
    let (status, body, elapsed) = pod_get(&pod("lonely")?, path, true).await?;
    println!(
        "    {:<11} {:<38} HTTP {status} in {:.1} ms: {}",
        "lonely",
        "(no binding)",
        elapsed.as_secs_f64() * 1000.0,
        body.trim()
    );
    println!(
        "\n    ARM: {} PATCH(es) on the scale set by mic; identities on it now: {}",
        cluster.arm.patch_count(&cluster.vmss),
        cluster.cloud.assigned_identities(&cluster.vmss)?.len()
    );
    let counters = cluster.imds.counters();
    println!(
        "    the VM's IMDS saw {} token requests ({} throttled)",
        counters.token_requests, counters.throttled
    );
    let unexpected: Vec<String> = rows
        .iter()
        .filter(|row| !row.as_expected())
        .map(|row| format!("{} asking {}", row.pod, row.asked))
        .collect();
    anyhow::ensure!(
        unexpected.is_empty(),
        "unexpected results: {}",
        unexpected.join(", ")
    );
    anyhow::ensure!(
        status == 400,
        "the unbound pod got HTTP {status}, not the final 400"
    );
    Ok(())
}

/// `true` when no network namespace named `name` exists any more.
fn namespace_gone(name: &str) -> bool {
    !Path::new("/run/netns").join(name).exists()
}

fn main() -> ExitCode {
    if !nix_is_root() {
        eprintln!(
            "podid-demo: needs root (network namespaces and iptables): run `sudo tests/scripts/run.sh demo`"
        );
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("podid-demo: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut cluster = None;
    let outcome = runtime.block_on(async {
        tokio::select! {
            result = run(&mut cluster) => result,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (Ctrl-C)")),
        }
    });
    step("Stopping mic and nmi and removing the namespaces");
    let node_namespace = cluster.as_ref().map(|c| c.node.name().to_owned());
    // Dropping the cluster kills mic and nmi and deletes the node namespace with its pods,
    // links and iptables rules.
    drop(cluster);
    runtime.shutdown_timeout(Duration::from_secs(5));
    if let Some(name) = node_namespace {
        if namespace_gone(&name) {
            println!("    namespace {name} and its pods removed; nothing left behind");
        } else {
            eprintln!("    namespace {name} is still there: run `make clean-netns`");
        }
    }
    match outcome {
        Ok(()) => {
            println!("\npodid-demo: OK");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\npodid-demo: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
