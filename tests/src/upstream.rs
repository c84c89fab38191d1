//! What an aad-pod-identity v1.8.x release leaves in a cluster, for the upgrade suites:
//! upstream's CRDs (schemas built from the facts in `crates/podid-api/tests/upstream-crd-schema.txt`,
//! shared with the CRD comparison test), a checker that says what upstream's schema would reject
//! or prune in an object, and a stand-in for the Go MIC's leader election on its Endpoints lock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use serde_json::{Map, Value, json};

use crate::kube;

/// Upstream's schema facts (one line per schema node).
const FACTS: &str = include_str!("../../crates/podid-api/tests/upstream-crd-schema.txt");

/// The annotation of upstream's Endpoints lock holding client-go's leader record.
pub const LEADER_ANNOTATION: &str = "control-plane.alpha.kubernetes.io/leader";

/// One schema node: type, format, nullable, embedded resource.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    ty: String,
    format: Option<String>,
    nullable: bool,
    embedded: bool,
}

fn section(name: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in FACTS.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{name}]");
            continue;
        }
        if inside && !line.is_empty() && !line.starts_with('#') {
            out.push(line);
        }
    }
    out
}

/// Every node of `kind`'s schema by path (`""` is the root), embedded copies expanded.
fn nodes(kind: &str) -> BTreeMap<String, Node> {
    let parse = |line: &str| -> (String, Node) {
        let mut words = line.split_whitespace();
        let path = words.next().unwrap_or_default().to_owned();
        let ty = words.next().unwrap_or_default().to_owned();
        let mut node = Node {
            ty,
            format: None,
            nullable: false,
            embedded: false,
        };
        for word in words {
            match word {
                "nullable" => node.nullable = true,
                "embedded" => node.embedded = true,
                other => node.format = Some(other.to_owned()),
            }
        }
        (path, node)
    };
    let mut out = BTreeMap::new();
    out.insert(
        String::new(),
        Node {
            ty: "object".into(),
            format: None,
            nullable: false,
            embedded: false,
        },
    );
    for line in section("TypeMeta").into_iter().chain(section(kind)) {
        let (path, node) = parse(line);
        out.insert(path, node);
    }
    if kind == "AzureAssignedIdentity" {
        for (prefix, embedded) in [
            ("spec.azureIdentityRef", "AzureIdentity"),
            ("spec.azureBindingRef", "AzureIdentityBinding"),
        ] {
            for line in section("TypeMeta").into_iter().chain(section(embedded)) {
                let (path, node) = parse(line);
                out.insert(format!("{prefix}.{path}"), node);
            }
        }
    }
    out
}

/// `kind`'s `openAPIV3Schema` as upstream's CRD declares it.
pub fn schema(kind: &str) -> Value {
    let nodes = nodes(kind);
    fn build(nodes: &BTreeMap<String, Node>, path: &str) -> Value {
        let node = &nodes[path];
        let mut out = Map::new();
        out.insert("type".into(), json!(node.ty));
        if let Some(f) = &node.format {
            out.insert("format".into(), json!(f));
        }
        if node.nullable {
            out.insert("nullable".into(), json!(true));
        }
        if node.embedded {
            out.insert("x-kubernetes-embedded-resource".into(), json!(true));
        }
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}.")
        };
        let mut properties = Map::new();
        for child in nodes.keys() {
            if let Some(name) = child.strip_prefix(&prefix)
                && !name.is_empty()
                && !name.contains('.')
                && !name.contains('[')
                && !name.contains('{')
                && (!path.is_empty() || !child.is_empty())
            {
                properties.insert(name.to_owned(), build(nodes, child));
            }
        }
        if !properties.is_empty() {
            out.insert("properties".into(), Value::Object(properties));
        }
        let items = format!("{path}[]");
        if nodes.contains_key(&items) {
            out.insert("items".into(), build(nodes, &items));
        }
        let values = format!("{path}{{}}");
        if nodes.contains_key(&values) {
            out.insert("additionalProperties".into(), build(nodes, &values));
        }
        Value::Object(out)
    }
    build(&nodes, "")
}

/// Upstream's four CRDs: names, scope and columns as podid's generated ones (identical to
/// upstream's, pinned by the CRD tests), schemas from upstream's facts.
pub fn crds() -> anyhow::Result<Vec<Value>> {
    let dir = crate::workspace_root().join("deploy/crds");
    let mut out = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    for path in paths {
        let mut crd: Value = serde_norway::from_str(&std::fs::read_to_string(&path)?)?;
        let kind = crd["spec"]["names"]["kind"]
            .as_str()
            .context("kind")?
            .to_owned();
        crd["metadata"]["annotations"] = json!({});
        for version in crd["spec"]["versions"].as_array_mut().context("versions")? {
            version["schema"]["openAPIV3Schema"] = schema(&kind);
        }
        out.push(crd);
    }
    Ok(out)
}

/// What upstream's schema would reject (wrong type, `null` where not nullable) or silently
/// prune (a field it does not declare) in `object`, by path. The metadata of the root and of
/// embedded resources is ObjectMeta, which the API server checks itself (labels and
/// annotations are free-form).
pub fn problems(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let nodes = nodes(kind);
    let mut out = Vec::new();
    check(&nodes, object, "", &mut out);
    out
}

fn check(nodes: &BTreeMap<String, Node>, value: &Value, path: &str, out: &mut Vec<String>) {
    let Some(node) = nodes.get(path) else {
        out.push(format!("{path}: not in upstream's schema (pruned)"));
        return;
    };
    let fits = match value {
        Value::Null => {
            if !node.nullable {
                out.push(format!(
                    "{path}: null where upstream's schema has no nullable"
                ));
            }
            return;
        }
        Value::String(_) => node.ty == "string",
        Value::Bool(_) => node.ty == "boolean",
        Value::Number(n) => node.ty == "integer" && (n.is_i64() || n.is_u64()),
        Value::Array(_) => node.ty == "array",
        Value::Object(_) => node.ty == "object",
    };
    if !fits {
        out.push(format!("{path}: {value} is not {} (rejected)", node.ty));
        return;
    }
    let sep = if path.is_empty() { "" } else { "." };
    match value {
        Value::Object(map) => {
            let values = format!("{path}{{}}");
            for (key, child) in map {
                let child_path = format!("{path}{sep}{key}");
                if key == "metadata" && (path.is_empty() || node.embedded) {
                    continue;
                }
                if nodes.contains_key(&child_path) {
                    check(nodes, child, &child_path, out);
                } else if nodes.contains_key(&values) {
                    check(nodes, child, &values, out);
                } else {
                    out.push(format!("{child_path}: not in upstream's schema (pruned)"));
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                check(nodes, item, &format!("{path}[]"), out);
            }
        }
        _ => {}
    }
}

/// client-go's `metav1.Time` text for now (whole seconds, UTC).
fn go_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    crate::kube::meta::rfc3339(secs)
}

#[derive(Debug, Default)]
struct State {
    leading: AtomicBool,
    stop: AtomicBool,
    renewals: AtomicUsize,
    /// Attempts that found another live holder.
    deferred: AtomicUsize,
}

/// A stand-in for one replica of the Go MIC's leader election: client-go's Endpoints lock, as
/// aad-pod-identity v1.8.x runs it. Every retry period (a quarter of the lease) it reads the
/// lock; a holder other than itself is live until its record has been unchanged (byte for
/// byte) for the stand-in's own lease duration on its own clock (as client-go judges it); otherwise it writes its
/// record (create, or update of the version read) and leads. [`GoMic::stop`] is its pod
/// being deleted: it stops renewing and leaves the record to expire.
///
/// It reaches the API server in-process ([`kube::Handle`]), so its requests never show in the
/// server's request log, which then holds only what podid's programs sent.
#[derive(Debug)]
pub struct GoMic {
    /// The holder identity (the pod name).
    pub identity: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GoMic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GoMic {
    /// Starts electing on `namespace/name` with `lease`.
    pub fn start(
        api: kube::Handle,
        namespace: &str,
        name: &str,
        identity: &str,
        lease: Duration,
    ) -> Self {
        let state = Arc::new(State::default());
        let collection = format!("/api/v1/namespaces/{namespace}/endpoints");
        let path = format!("{collection}/{name}");
        let task = tokio::spawn({
            let state = state.clone();
            let identity = identity.to_owned();
            let name = name.to_owned();
            let namespace = namespace.to_owned();
            async move {
                let mut observed: Option<(String, Instant)> = None;
                while !state.stop.load(Ordering::SeqCst) {
                    let leads = attempt(
                        &api,
                        &collection,
                        &path,
                        &namespace,
                        &name,
                        &identity,
                        lease,
                        &mut observed,
                        &state,
                    );
                    if !state.stop.load(Ordering::SeqCst) {
                        state.leading.store(leads, Ordering::SeqCst);
                    }
                    tokio::time::sleep(lease / 4).await;
                }
            }
        });
        Self {
            identity: identity.to_owned(),
            state,
            task,
        }
    }

    /// Whether it holds the lock now.
    pub fn leading(&self) -> bool {
        self.state.leading.load(Ordering::SeqCst)
    }

    /// Successful writes of its own record (acquisitions and renewals).
    pub fn renewals(&self) -> usize {
        self.state.renewals.load(Ordering::SeqCst)
    }

    /// Attempts that found another live holder and stayed follower.
    pub fn deferred(&self) -> usize {
        self.state.deferred.load(Ordering::SeqCst)
    }

    /// Its pod is deleted: no more renewals (the record is left to expire).
    pub fn stop(&self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.state.leading.store(false, Ordering::SeqCst);
    }
}

#[allow(clippy::too_many_arguments)]
fn attempt(
    api: &kube::Handle,
    collection: &str,
    path: &str,
    namespace: &str,
    name: &str,
    identity: &str,
    lease: Duration,
    observed: &mut Option<(String, Instant)>,
    state: &State,
) -> bool {
    let now = go_now();
    let record = |acquire: &str, transitions: i64| {
        json!({
            "holderIdentity": identity,
            "leaseDurationSeconds": lease.as_secs().max(1),
            "acquireTime": acquire,
            "renewTime": now,
            "leaderTransitions": transitions,
        })
        .to_string()
    };
    let current = match api.get_json(path) {
        Ok(current) => current,
        Err(e) if e.code == 404 => {
            let created = api.create_json(
                collection,
                json!({"apiVersion": "v1", "kind": "Endpoints",
                       "metadata": {"name": name, "namespace": namespace,
                                    "annotations": {LEADER_ANNOTATION: record(&now, 0)}}}),
            );
            if created.is_ok() {
                state.renewals.fetch_add(1, Ordering::SeqCst);
            }
            return created.is_ok();
        }
        Err(_) => return false,
    };
    let raw = current["metadata"]["annotations"][LEADER_ANNOTATION]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let seen_at = Instant::now();
    if observed.as_ref().is_none_or(|(r, _)| *r != raw) {
        *observed = Some((raw.clone(), seen_at));
    }
    let old: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
    let holder = old["holderIdentity"].as_str().unwrap_or_default();
    // client-go judges expiry by its own configured lease duration, not the record's.
    let duration = lease;
    let since = observed.as_ref().map_or(seen_at, |(_, at)| *at);
    if !holder.is_empty() && holder != identity && seen_at.duration_since(since) < duration {
        state.deferred.fetch_add(1, Ordering::SeqCst);
        return false;
    }
    let transitions = old["leaderTransitions"].as_i64().unwrap_or(0);
    let (acquire, transitions) = if holder == identity {
        (
            old["acquireTime"].as_str().unwrap_or(&now).to_owned(),
            transitions,
        )
    } else {
        (now.clone(), transitions + 1)
    };
    let mut next = current;
    next["metadata"]["annotations"][LEADER_ANNOTATION] = json!(record(&acquire, transitions));
    match api.replace_json(path, next) {
        Ok(written) => {
            let raw = written["metadata"]["annotations"][LEADER_ANNOTATION]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            *observed = Some((raw, Instant::now()));
            state.renewals.fetch_add(1, Ordering::SeqCst);
            true
        }
        Err(_) => false,
    }
}
