//! Generic JSON object storage with a global `resourceVersion`, an event history window per
//! kind and a broadcast of changes for watches.
//!
//! The history window follows the real API server's watch cache: one window per resource (a
//! burst of Event writes does not expire the Pods' history), holding at least
//! [`Store::new`]'s `history_limit` changes and, beyond that, every change younger than the
//! freshness period (kube-apiserver keeps 75 s of events and grows its cache up to 102,400 to
//! do so), never more than [`HISTORY_CAP`]. A watch from a version older than its kind's window
//! gets `410 Expired`.

use crate::kinds::KindSpec;
use crate::meta;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// The most changes a kind's history window holds however fresh (kube-apiserver's watch-cache
/// upper bound, 100 × 1024).
pub const HISTORY_CAP: usize = 100 * 1024;

/// How long a change stays in its kind's history window at least (up to [`HISTORY_CAP`]):
/// kube-apiserver's watch-cache freshness period.
pub const HISTORY_FRESH: Duration = Duration::from_secs(75);

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

/// One stored change, as kept in the history window and broadcast to watches.
#[derive(Debug)]
pub struct Change {
    /// The global resourceVersion of this change.
    pub rv: u64,
    /// Index of the kind.
    pub kind: usize,
    /// Namespace (`""` for cluster-scoped).
    pub namespace: String,
    /// What happened.
    pub op: Op,
    /// The object before the change (for selector transitions).
    pub old: Option<Value>,
    /// The object after the change (the last state for deletions).
    pub new: Value,
}

/// Which part of an object an update writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The main endpoint.
    Main,
    /// The `/status` subresource.
    Status,
}

/// `DeleteOptions.preconditions`.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    /// Required uid.
    pub uid: Option<String>,
    /// Required resourceVersion.
    pub resource_version: Option<String>,
}

/// Selectors and scope of a list or watch.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this namespace (None: all).
    pub namespace: Option<String>,
    /// Label selector.
    pub labels: LabelSelector,
    /// Field selector.
    pub fields: FieldSelector,
}

impl Filter {
    /// Whether `obj` (of the watched kind, in `ns`) passes.
    pub fn matches(&self, ns: &str, obj: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|want| want == ns)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }
}

type Key = (String, String);

/// An object's uid and the manager of each leaf field path an apply set.
type Owners = (String, BTreeMap<String, String>);

/// The longest `note` an events.k8s.io Event may have, in bytes.
pub const EVENT_NOTE_LIMIT: usize = 1024;

fn is_core(spec: &KindSpec, plural: &str) -> bool {
    spec.group.is_empty() && spec.plural == plural
}

/// What the real server does to a body before storing it: a Secret's `stringData` is folded
/// into `data` (base64), its values winning, and never stored.
fn normalize(spec: &KindSpec, obj: &mut Value) -> Result<(), String> {
    if is_core(spec, "secrets")
        && let Some(m) = obj.as_object_mut()
        && let Some(sd) = m.remove("stringData")
    {
        let sd = match sd {
            Value::Null => return Ok(()),
            Value::Object(sd) => sd,
            _ => return Err("stringData must be an object of strings".into()),
        };
        if !m.get("data").is_some_and(Value::is_object) {
            m.insert("data".into(), json!({}));
        }
        let data = m
            .get_mut("data")
            .and_then(Value::as_object_mut)
            .ok_or("data must be an object")?;
        for (k, v) in sd {
            let v = v
                .as_str()
                .ok_or_else(|| format!("stringData.{k} must be a string"))?;
            data.insert(
                k,
                json!(base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    v
                )),
            );
        }
    }
    Ok(())
}

/// How a watch starts.
#[derive(Debug)]
pub struct WatchStart {
    /// Events to send before live ones.
    pub initial: Vec<Arc<Change>>,
    /// resourceVersion up to which `initial` covers everything.
    pub rv: u64,
    /// Live changes after `rv`.
    pub rx: broadcast::Receiver<Arc<Change>>,
}

/// The state behind the server.
#[derive(Debug)]
pub struct Store {
    kinds: Vec<KindSpec>,
    objects: Vec<BTreeMap<Key, Value>>,
    rv: u64,
    /// Per kind: its recent changes and when each was made.
    history: Vec<VecDeque<(Instant, Arc<Change>)>>,
    /// Per kind: watches may resume from any rv >= floor.
    floor: Vec<u64>,
    history_limit: usize,
    history_fresh: Duration,
    tx: broadcast::Sender<Arc<Change>>,
    /// Server-side apply ownership: per object (kind, namespace, name), its uid and the manager
    /// of each leaf field path an apply set.
    owners: BTreeMap<(usize, String, String), Owners>,
    /// While set (a `dryRun=All` request), writes are computed and answered but never stored,
    /// broadcast or given a new resourceVersion.
    pub(crate) dry_run: bool,
    /// While set ([`crate::FakeApiServer::seed_legacy_json`]), custom resources are stored
    /// without schema validation or pruning.
    pub(crate) skip_schema: bool,
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

fn has_finalizers(obj: &Value) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty())
}

impl Store {
    /// An empty store with the given kinds and history window: at least `history_limit`
    /// changes per kind, and every change younger than [`HISTORY_FRESH`] (see
    /// [`Store::set_history_fresh`]) up to [`HISTORY_CAP`].
    pub fn new(kinds: Vec<KindSpec>, history_limit: usize) -> Self {
        let (tx, _) = broadcast::channel(16_384);
        let objects = kinds.iter().map(|_| BTreeMap::new()).collect();
        let history = kinds.iter().map(|_| VecDeque::new()).collect();
        let floor = kinds.iter().map(|_| 0).collect();
        Self {
            kinds,
            objects,
            rv: 0,
            history,
            floor,
            history_limit: history_limit.max(1),
            history_fresh: HISTORY_FRESH,
            tx,
            owners: BTreeMap::new(),
            dry_run: false,
            skip_schema: false,
        }
    }

    /// All registered kinds, by index.
    pub fn kinds(&self) -> &[KindSpec] {
        &self.kinds
    }

    /// Registers (or replaces the description of) a kind; returns its index.
    pub fn register(&mut self, spec: KindSpec) -> usize {
        if let Some(i) = self.find(&spec.group, &spec.version, &spec.plural) {
            self.kinds[i] = spec;
            return i;
        }
        self.kinds.push(spec);
        self.objects.push(BTreeMap::new());
        self.history.push(VecDeque::new());
        // It had no changes before: a watch from any version replays only what follows.
        self.floor.push(0);
        self.kinds.len() - 1
    }

    /// Index of the kind served at `group/version/plural`.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<usize> {
        self.kinds
            .iter()
            .position(|k| k.group == group && k.version == version && k.plural == plural)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// How long changes stay in the history window beyond `history_limit` (default
    /// [`HISTORY_FRESH`]; `Duration::ZERO`: exactly `history_limit` changes per kind).
    pub fn set_history_fresh(&mut self, fresh: Duration) {
        self.history_fresh = fresh;
    }

    /// Drops the event history: watches from any older version get `410 Expired`.
    pub fn compact(&mut self) {
        for history in &mut self.history {
            history.clear();
        }
        for floor in &mut self.floor {
            *floor = self.rv;
        }
    }

    fn commit(&mut self, kind: usize, op: Op, old: Option<Value>, mut new: Value) -> Value {
        if self.dry_run {
            let md = metadata_mut(&mut new);
            match old.as_ref().and_then(|o| meta_str(o, "resourceVersion")) {
                Some(rv) => md.insert("resourceVersion".into(), json!(rv)),
                None => md.remove("resourceVersion"),
            };
            return new;
        }
        self.rv += 1;
        metadata_mut(&mut new).insert("resourceVersion".into(), json!(self.rv.to_string()));
        let ns = meta_str(&new, "namespace").unwrap_or("").to_string();
        let name = meta_str(&new, "name").unwrap_or("").to_string();
        let key = (ns.clone(), name);
        if op == Op::Deleted {
            self.objects[kind].remove(&key);
        } else {
            self.objects[kind].insert(key, new.clone());
        }
        let change = Arc::new(Change {
            rv: self.rv,
            kind,
            namespace: ns,
            op,
            old,
            new: new.clone(),
        });
        let now = Instant::now();
        let history = &mut self.history[kind];
        history.push_back((now, change.clone()));
        while history.len() > self.history_limit
            && history.front().is_some_and(|(at, _)| {
                history.len() > HISTORY_CAP || now.duration_since(*at) >= self.history_fresh
            })
        {
            if let Some((_, c)) = history.pop_front() {
                self.floor[kind] = c.rv;
            }
        }
        // No receivers is fine.
        let _ = self.tx.send(change);
        new
    }

    /// One object.
    pub fn get(&self, kind: usize, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects[kind]
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| self.not_found(kind, name))
    }

    fn not_found(&self, kind: usize, name: &str) -> ApiError {
        let k = &self.kinds[kind];
        ApiError::not_found(&k.plural, &k.group, name)
    }

    fn conflict(&self, kind: usize, name: &str, why: &str) -> ApiError {
        let k = &self.kinds[kind];
        ApiError::conflict(&k.plural, &k.group, name, why)
    }

    /// Matching objects, sorted by namespace and name, and the list resourceVersion.
    pub fn list(&self, kind: usize, filter: &Filter) -> (Vec<Value>, u64) {
        let items = self.objects[kind]
            .iter()
            .filter(|((ns, _), v)| filter.matches(ns, v))
            .map(|(_, v)| v.clone())
            .collect();
        (items, self.rv)
    }

    /// Checks `apiVersion`/`kind` in a body and fills them in when missing.
    fn check_type(&self, kind: usize, obj: &mut Value) -> Result<(), ApiError> {
        let k = &self.kinds[kind];
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        let api_version = k.api_version();
        match obj.get("apiVersion").and_then(Value::as_str) {
            None | Some("") => obj["apiVersion"] = json!(api_version),
            Some(v) if v == api_version => {}
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "the API version in the data ({v}) does not match the expected API version ({api_version})"
                )));
            }
        }
        match obj.get("kind").and_then(Value::as_str) {
            None | Some("") => obj["kind"] = json!(k.kind),
            Some(v) if v == k.kind => {}
            Some(v) => {
                return Err(ApiError::bad_request(format!(
                    "the kind in the data ({v}) does not match the expected kind ({})",
                    k.kind
                )));
            }
        }
        Ok(())
    }

    fn check_namespace(&self, kind: usize, ns: &str, obj: &mut Value) -> Result<(), ApiError> {
        let namespaced = self.kinds[kind].namespaced;
        let md = metadata_mut(obj);
        match md.get("namespace").and_then(Value::as_str) {
            None | Some("") => {
                if namespaced {
                    md.insert("namespace".into(), json!(ns));
                } else {
                    md.remove("namespace");
                }
            }
            Some(v) if namespaced && v == ns => {}
            Some(_) if !namespaced => {
                md.remove("namespace");
            }
            Some(_) => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
        }
        Ok(())
    }

    fn validate(&self, kind: usize, obj: &Value) -> Result<(), ApiError> {
        let k = &self.kinds[kind];
        let name = meta_str(obj, "name").unwrap_or("");
        let name_error = if k.group == "rbac.authorization.k8s.io" {
            meta::path_segment_error(name)
        } else {
            meta::dns_subdomain_error(name)
        };
        if let Some(why) = name_error {
            let detail = format!("Invalid value: \"{name}\": {why}");
            return Err(ApiError::invalid(
                &k.kind,
                &k.group,
                name,
                "metadata.name",
                &detail,
            ));
        }
        if k.group == "events.k8s.io"
            && let Some(note) = obj.get("note").and_then(Value::as_str)
            && note.len() > EVENT_NOTE_LIMIT
        {
            return Err(ApiError::invalid(
                &k.kind,
                &k.group,
                name,
                "note",
                &format!("Too long: may not be more than {EVENT_NOTE_LIMIT} bytes"),
            ));
        }
        if let Some(labels) = obj.pointer("/metadata/labels") {
            let ok = labels.as_object().is_some_and(|m| {
                m.values()
                    .all(|v| v.as_str().is_some_and(|s| s.len() <= 63))
            });
            if !ok {
                return Err(ApiError::invalid(
                    &k.kind,
                    &k.group,
                    name,
                    "metadata.labels",
                    "Invalid value: label values must be strings of at most 63 characters",
                ));
            }
        }
        Ok(())
    }

    /// Server-side apply's field ownership, at leaf granularity: every leaf value of `applied`
    /// (maps are walked, lists and scalars are leaves) belongs to `manager` after the apply. A
    /// leaf another manager owns whose value the apply changes is a `409 Conflict` unless
    /// `force`. Only applies take ownership (updates and other patches do not).
    #[allow(clippy::too_many_arguments)]
    pub fn apply_ownership(
        &mut self,
        kind: usize,
        ns: &str,
        name: &str,
        live: &Value,
        applied: &Value,
        manager: &str,
        force: bool,
    ) -> Result<(), ApiError> {
        fn leaves(v: &Value, path: String, out: &mut Vec<(String, Value)>) {
            match v {
                Value::Object(m) if !m.is_empty() => {
                    for (k, c) in m {
                        leaves(c, format!("{path}.{k}"), out);
                    }
                }
                _ => out.push((path, v.clone())),
            }
        }
        let mut applied_leaves = Vec::new();
        leaves(applied, String::new(), &mut applied_leaves);
        applied_leaves.retain(|(p, _)| {
            !matches!(
                p.as_str(),
                ".apiVersion"
                    | ".kind"
                    | ".metadata.name"
                    | ".metadata.namespace"
                    | ".metadata.resourceVersion"
            )
        });
        let ns = ns_key(&self.kinds[kind], ns);
        let uid = meta_str(live, "uid").unwrap_or("").to_string();
        let key = (kind, ns, name.to_string());
        let mut table = match self.owners.get(&key) {
            Some((u, t)) if *u == uid => t.clone(),
            _ => BTreeMap::new(),
        };
        let mut conflicts = Vec::new();
        for (path, value) in &applied_leaves {
            if let Some(owner) = table.get(path)
                && owner != manager
            {
                let pointer = path.replace('.', "/");
                if live.pointer(&pointer) != Some(value) {
                    conflicts.push((owner.clone(), path.clone()));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            let k = &self.kinds[kind];
            let list: Vec<String> = conflicts
                .iter()
                .map(|(o, p)| format!("conflict with \"{o}\": {p}"))
                .collect();
            let mut e = ApiError::conflict(&k.plural, &k.group, name, "");
            e.message = format!(
                "Apply failed with {} conflict{}: {}",
                conflicts.len(),
                if conflicts.len() == 1 { "" } else { "s" },
                list.join("\n")
            );
            if let Some(d) = e.details.as_mut() {
                d["causes"] = Value::Array(
                    conflicts
                        .iter()
                        .map(|(o, p)| {
                            json!({"reason": "FieldManagerConflict",
                            "message": format!("conflict with \"{o}\""), "field": p})
                        })
                        .collect(),
                );
            }
            return Err(e);
        }
        if self.dry_run {
            return Ok(());
        }
        // The manager's previous fields it no longer applies are released.
        table.retain(|_, o| o != manager);
        for (path, _) in applied_leaves {
            table.insert(path, manager.to_string());
        }
        self.owners.insert(key, (uid, table));
        Ok(())
    }

    /// Validates a custom resource against its CRD's structural schema and prunes unknown
    /// fields, as a real server does.
    fn check_schema(&self, kind: usize, obj: &mut Value) -> Result<(), ApiError> {
        let k = &self.kinds[kind];
        if !k.custom || self.skip_schema {
            return Ok(());
        }
        let Some(schema) = crate::schema::crd_schema(self, k) else {
            return Ok(());
        };
        let mut errs = Vec::new();
        crate::schema::check(&schema, obj, "", &mut errs);
        match errs.into_iter().next() {
            None => Ok(()),
            Some((field, detail)) => Err(ApiError::invalid(
                &format!("{}.{}", k.kind, k.group),
                &k.group,
                meta_str(obj, "name").unwrap_or(""),
                &field,
                &detail,
            )),
        }
    }

    /// Creates an object (POST to the collection).
    pub fn create(&mut self, kind: usize, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        self.check_type(kind, &mut obj)?;
        self.check_namespace(kind, ns, &mut obj)?;
        self.check_namespace_exists(kind, ns)?;
        normalize(&self.kinds[kind], &mut obj).map_err(ApiError::bad_request)?;
        self.check_schema(kind, &mut obj)?;
        let name = meta_str(&obj, "name").unwrap_or("").to_string();
        let name = if name.is_empty() {
            let Some(prefix) = meta_str(&obj, "generateName").filter(|p| !p.is_empty()) else {
                let k = &self.kinds[kind];
                return Err(ApiError::invalid(
                    &k.kind,
                    &k.group,
                    "",
                    "metadata.name",
                    "Required value: name or generateName is required",
                ));
            };
            let prefix = prefix.to_string();
            let mut candidate = format!("{prefix}{}", meta::name_suffix());
            while self.objects[kind]
                .contains_key(&(ns_key(&self.kinds[kind], ns), candidate.clone()))
            {
                candidate = format!("{prefix}{}", meta::name_suffix());
            }
            candidate
        } else {
            name
        };
        let key = (ns_key(&self.kinds[kind], ns), name.clone());
        if self.objects[kind].contains_key(&key) {
            let k = &self.kinds[kind];
            return Err(ApiError::already_exists(&k.plural, &k.group, &name));
        }
        let md = metadata_mut(&mut obj);
        md.insert("name".into(), json!(name));
        md.insert("uid".into(), json!(meta::new_uid()));
        md.insert(
            "creationTimestamp".into(),
            json!(meta::rfc3339(meta::unix_now())),
        );
        md.insert("generation".into(), json!(1));
        md.remove("resourceVersion");
        md.remove("deletionTimestamp");
        md.remove("deletionGracePeriodSeconds");
        md.remove("managedFields");
        self.validate(kind, &obj)?;
        let created = self.commit(kind, Op::Added, None, obj);
        if is_core(&self.kinds[kind], "namespaces")
            && !self.dry_run
            && let Some(sa) = self.find("", "v1", "serviceaccounts")
        {
            // As the real ServiceAccount controller: every namespace gets `default`.
            self.create(sa, &name, json!({"metadata": {"name": "default"}}))?;
        }
        Ok(created)
    }

    /// `404` for a namespace that does not exist, `403` for one being deleted, as the real
    /// server's namespace lifecycle admission.
    fn check_namespace_exists(&self, kind: usize, ns: &str) -> Result<(), ApiError> {
        if !self.kinds[kind].namespaced {
            return Ok(());
        }
        let Some(nk) = self.find("", "v1", "namespaces") else {
            return Ok(());
        };
        match self.objects[nk].get(&(String::new(), ns.to_string())) {
            None => Err(ApiError::not_found("namespaces", "", ns)),
            Some(n) if meta_str(n, "deletionTimestamp").is_some() => Err(ApiError {
                code: 403,
                reason: "Forbidden",
                message: format!(
                    "unable to create new content in namespace {ns} because it is being terminated"
                ),
                details: Some(json!({"name": ns, "kind": "namespaces"})),
                retry_after: None,
            }),
            Some(_) => Ok(()),
        }
    }

    /// Replaces an object (PUT), on the main endpoint or the status subresource.
    pub fn update(
        &mut self,
        kind: usize,
        ns: &str,
        name: &str,
        mut obj: Value,
        target: Target,
    ) -> Result<Value, ApiError> {
        self.check_type(kind, &mut obj)?;
        self.check_namespace(kind, ns, &mut obj)?;
        normalize(&self.kinds[kind], &mut obj).map_err(ApiError::bad_request)?;
        let ns = ns_key(&self.kinds[kind], ns);
        let existing = self.get(kind, &ns, name)?;
        match meta_str(&obj, "name") {
            None | Some("") => {
                metadata_mut(&mut obj).insert("name".into(), json!(name));
            }
            Some(n) if n == name => {}
            Some(n) => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({name})"
                )));
            }
        }
        if let Some(rv) = meta_str(&obj, "resourceVersion").filter(|rv| !rv.is_empty())
            && Some(rv) != meta_str(&existing, "resourceVersion")
        {
            return Err(self.conflict(kind, name, ApiError::STALE));
        }
        let spec = &self.kinds[kind];
        let mut new = match target {
            Target::Status => {
                let mut n = existing.clone();
                match obj.get("status") {
                    Some(s) => n["status"] = s.clone(),
                    None => {
                        if let Some(m) = n.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
                n
            }
            Target::Main => {
                if spec.status_subresource {
                    match existing.get("status") {
                        Some(s) => obj["status"] = s.clone(),
                        None => {
                            if let Some(m) = obj.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
                obj
            }
        };
        // Fields the client cannot change.
        let old_md = existing
            .get("metadata")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let md = metadata_mut(&mut new);
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
            "namespace",
        ] {
            match old_md.get(f) {
                Some(v) => md.insert(f.into(), v.clone()),
                None => md.remove(f),
            };
        }
        md.remove("managedFields");
        self.check_schema(kind, &mut new)?;
        if new == existing {
            return Ok(existing);
        }
        if content_changed(spec, &existing, &new) {
            let g = old_md
                .get("generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            metadata_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        self.validate(kind, &new)?;
        if meta_str(&new, "deletionTimestamp").is_some() && !has_finalizers(&new) {
            return Ok(self.commit(kind, Op::Deleted, Some(existing), new));
        }
        Ok(self.commit(kind, Op::Modified, Some(existing), new))
    }

    /// Deletes an object; with finalizers it only gets a `deletionTimestamp`.
    pub fn delete(
        &mut self,
        kind: usize,
        ns: &str,
        name: &str,
        pre: &Preconditions,
    ) -> Result<Value, ApiError> {
        let ns = ns_key(&self.kinds[kind], ns);
        let existing = self.get(kind, &ns, name)?;
        if let Some(uid) = &pre.uid
            && Some(uid.as_str()) != meta_str(&existing, "uid")
        {
            let why = format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                meta_str(&existing, "uid").unwrap_or("")
            );
            return Err(self.conflict(kind, name, &why));
        }
        if let Some(rv) = &pre.resource_version
            && Some(rv.as_str()) != meta_str(&existing, "resourceVersion")
        {
            let why = format!(
                "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                meta_str(&existing, "resourceVersion").unwrap_or("")
            );
            return Err(self.conflict(kind, name, &why));
        }
        if is_core(&self.kinds[kind], "namespaces") {
            // As the namespace controller, at once: everything in the namespace goes with it
            // (objects with finalizers only get their deletionTimestamp).
            for k in 0..self.kinds.len() {
                if !self.kinds[k].namespaced {
                    continue;
                }
                let names: Vec<String> = self.objects[k]
                    .keys()
                    .filter(|(ons, _)| ons == name)
                    .map(|(_, n)| n.clone())
                    .collect();
                for n in names {
                    self.delete(k, name, &n, &Preconditions::default())?;
                }
            }
        }
        if has_finalizers(&existing) {
            if meta_str(&existing, "deletionTimestamp").is_some() {
                return Ok(existing);
            }
            let mut new = existing.clone();
            let md = metadata_mut(&mut new);
            md.insert(
                "deletionTimestamp".into(),
                json!(meta::rfc3339(meta::unix_now())),
            );
            md.insert("deletionGracePeriodSeconds".into(), json!(0));
            return Ok(self.commit(kind, Op::Modified, Some(existing), new));
        }
        let last = existing.clone();
        Ok(self.commit(kind, Op::Deleted, Some(existing), last))
    }

    /// Starts a watch: validates the resourceVersion against the history window and gathers
    /// the events to replay, subscribing to live changes in the same critical section.
    pub fn watch(
        &self,
        kind: usize,
        filter: &Filter,
        from: Option<u64>,
    ) -> Result<WatchStart, ApiError> {
        let rx = self.tx.subscribe();
        let initial = match from {
            Some(rv) if rv < self.floor[kind] => {
                return Err(ApiError::expired(rv, self.floor[kind] + 1));
            }
            Some(rv) => self.history[kind]
                .iter()
                .filter(|(_, c)| c.rv > rv)
                .map(|(_, c)| c.clone())
                .collect(),
            None => self.objects[kind]
                .iter()
                .filter(|((ns, _), v)| filter.matches(ns, v))
                .map(|((ns, _), v)| {
                    Arc::new(Change {
                        rv: self.rv,
                        kind,
                        namespace: ns.clone(),
                        op: Op::Added,
                        old: None,
                        new: v.clone(),
                    })
                })
                .collect(),
        };
        Ok(WatchStart {
            initial,
            rv: self.rv,
            rx,
        })
    }
}

/// The storage namespace key: the path namespace for namespaced kinds, `""` otherwise.
fn ns_key(spec: &KindSpec, ns: &str) -> String {
    if spec.namespaced {
        ns.to_string()
    } else {
        String::new()
    }
}

/// Whether anything other than metadata (and status, for kinds with a status subresource)
/// changed: what bumps `metadata.generation`.
fn content_changed(spec: &KindSpec, old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            if spec.status_subresource {
                m.remove("status");
            }
        }
        v
    };
    strip(old) != strip(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds;

    fn store() -> (Store, usize) {
        let mut s = Store::new(kinds::builtin(), 100);
        let nss = s
            .find("", "v1", "namespaces")
            .expect("namespaces registered");
        s.create(nss, "", json!({"metadata": {"name": "ns"}}))
            .expect("namespace");
        let pods = s.find("", "v1", "pods").expect("pods registered");
        (s, pods)
    }

    #[test]
    fn create_assigns_metadata_and_global_rv() {
        let (mut s, pods) = store();
        let cm = s.find("", "v1", "configmaps").expect("configmaps");
        let a = s
            .create(pods, "ns", json!({"metadata": {"name": "a"}}))
            .expect("create");
        let b = s
            .create(cm, "ns", json!({"metadata": {"generateName": "c-"}}))
            .expect("create");
        // rv 1 and 2 are the namespace and its `default` ServiceAccount.
        assert_eq!(a["metadata"]["resourceVersion"], "3");
        assert_eq!(b["metadata"]["resourceVersion"], "4");
        assert_eq!(a["kind"], "Pod");
        assert_eq!(a["metadata"]["namespace"], "ns");
        assert_eq!(a["metadata"]["generation"], 1);
        let bn = b["metadata"]["name"].as_str().expect("name");
        assert!(bn.starts_with("c-") && bn.len() == 7, "{bn}");
        let err = s
            .create(pods, "ns", json!({"metadata": {"name": "a"}}))
            .expect_err("dup");
        assert_eq!((err.code, err.reason), (409, "AlreadyExists"));
        let err = s
            .create(pods, "ns", json!({"metadata": {"name": "A_b"}}))
            .expect_err("bad");
        assert_eq!((err.code, err.reason), (422, "Invalid"));
    }

    #[test]
    fn stale_update_conflicts_and_noop_keeps_rv() {
        let (mut s, pods) = store();
        let a = s
            .create(
                pods,
                "ns",
                json!({"metadata": {"name": "a"}, "spec": {"x": 1}}),
            )
            .expect("create");
        let mut b = a.clone();
        b["spec"]["x"] = json!(2);
        let b2 = s
            .update(pods, "ns", "a", b.clone(), Target::Main)
            .expect("update");
        assert_eq!(b2["metadata"]["generation"], 2);
        let err = s
            .update(pods, "ns", "a", b, Target::Main)
            .expect_err("stale");
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        let same = s
            .update(pods, "ns", "a", b2.clone(), Target::Main)
            .expect("noop");
        assert_eq!(
            same["metadata"]["resourceVersion"],
            b2["metadata"]["resourceVersion"]
        );
    }

    #[test]
    fn watch_from_compacted_version_is_expired() {
        let (mut s, pods) = store();
        s.create(pods, "ns", json!({"metadata": {"name": "a"}}))
            .expect("create");
        s.create(pods, "ns", json!({"metadata": {"name": "b"}}))
            .expect("create");
        let w = s.watch(pods, &Filter::default(), Some(3)).expect("watch");
        assert_eq!(w.initial.len(), 1);
        s.compact();
        let err = s
            .watch(pods, &Filter::default(), Some(3))
            .expect_err("expired");
        assert_eq!((err.code, err.reason), (410, "Expired"));
        assert!(s.watch(pods, &Filter::default(), Some(4)).is_ok());
    }

    /// Each kind has its own window, as kube-apiserver has one watch cache per resource: a
    /// burst of another kind's writes (Events, a controller's own objects) does not expire a
    /// pod watch; the pods' own changes beyond the window do.
    #[test]
    fn history_windows_are_per_kind_and_count_only_their_own_changes() {
        let (mut s, pods) = store();
        s.set_history_fresh(Duration::ZERO);
        let cms = s.find("", "v1", "configmaps").expect("configmaps");
        let a = s
            .create(pods, "ns", json!({"metadata": {"name": "a"}}))
            .expect("create");
        let from: u64 = a["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .expect("rv");
        for i in 0..250 {
            s.create(cms, "ns", json!({"metadata": {"name": format!("cm-{i}")}}))
                .expect("configmap");
        }
        s.create(pods, "ns", json!({"metadata": {"name": "b"}}))
            .expect("create");
        let w = s
            .watch(pods, &Filter::default(), Some(from))
            .expect("in the pods' window");
        assert_eq!(w.initial.len(), 1, "b replayed");
        // The configmaps' window (100) lost its oldest 150.
        let err = s
            .watch(cms, &Filter::default(), Some(from))
            .expect_err("configmaps expired");
        assert_eq!((err.code, err.reason), (410, "Expired"));
        for i in 0..100 {
            s.create(pods, "ns", json!({"metadata": {"name": format!("p-{i}")}}))
                .expect("create");
        }
        let err = s
            .watch(pods, &Filter::default(), Some(from))
            .expect_err("pods expired by their own changes");
        assert_eq!((err.code, err.reason), (410, "Expired"));
    }

    /// Beyond its minimum, a window keeps every change younger than the freshness period (as
    /// kube-apiserver grows its watch cache to keep 75 s), up to the cap.
    #[test]
    fn history_keeps_fresh_changes_beyond_the_minimum() {
        let (mut s, pods) = store();
        let a = s
            .create(pods, "ns", json!({"metadata": {"name": "a"}}))
            .expect("create");
        let from: u64 = a["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .expect("rv");
        for i in 0..500 {
            s.create(pods, "ns", json!({"metadata": {"name": format!("p-{i}")}}))
                .expect("create");
        }
        let w = s
            .watch(pods, &Filter::default(), Some(from))
            .expect("fresh changes kept");
        assert_eq!(w.initial.len(), 500);
    }

    #[test]
    fn namespaces_must_exist_get_a_default_service_account_and_take_their_content_along() {
        let (mut s, pods) = store();
        let nss = s.find("", "v1", "namespaces").expect("namespaces");
        let sas = s
            .find("", "v1", "serviceaccounts")
            .expect("serviceaccounts");
        let err = s
            .create(pods, "nope", json!({"metadata": {"name": "a"}}))
            .expect_err("no namespace");
        assert_eq!((err.code, err.reason), (404, "NotFound"));
        assert_eq!(err.message, "namespaces \"nope\" not found");
        assert!(s.get(sas, "ns", "default").is_ok());
        s.create(pods, "ns", json!({"metadata": {"name": "a"}}))
            .expect("create");
        s.create(
            pods,
            "ns",
            json!({"metadata": {"name": "held", "finalizers": ["x/y"]}}),
        )
        .expect("create");
        s.delete(nss, "", "ns", &Preconditions::default())
            .expect("delete namespace");
        assert_eq!(s.get(pods, "ns", "a").expect_err("gone").code, 404);
        assert_eq!(s.get(sas, "ns", "default").expect_err("gone").code, 404);
        let held = s.get(pods, "ns", "held").expect("finalizer holds it");
        assert!(held.pointer("/metadata/deletionTimestamp").is_some());
    }

    #[test]
    fn secret_string_data_is_folded_into_data() {
        let (mut s, _) = store();
        let secrets = s.find("", "v1", "secrets").expect("secrets");
        let sec = s
            .create(
                secrets,
                "ns",
                json!({"metadata": {"name": "s"}, "data": {"a": "b2xk", "keep": "eA=="},
                    "stringData": {"a": "new", "b": "é"}}),
            )
            .expect("create");
        assert_eq!(sec.get("stringData"), None);
        assert_eq!(
            sec["data"],
            json!({"a": "bmV3", "b": "w6k=", "keep": "eA=="})
        );
        let mut upd = sec.clone();
        upd["stringData"] = json!({"c": "x"});
        let upd = s
            .update(secrets, "ns", "s", upd, Target::Main)
            .expect("update");
        assert_eq!(upd.get("stringData"), None);
        assert_eq!(upd["data"]["c"], "eA==");
        let err = s
            .create(
                secrets,
                "ns",
                json!({"metadata": {"name": "t"}, "stringData": {"a": 1}}),
            )
            .expect_err("not a string");
        assert_eq!(err.code, 400);
    }

    #[test]
    fn event_notes_over_1024_bytes_are_invalid() {
        let (mut s, _) = store();
        let events = s.find("events.k8s.io", "v1", "events").expect("events");
        let ev = |name: &str, note: String| json!({"metadata": {"name": name}, "note": note});
        s.create(events, "ns", ev("ok", "é".repeat(512)))
            .expect("1024 bytes");
        let err = s
            .create(events, "ns", ev("long", format!("{}a", "é".repeat(512))))
            .expect_err("1025 bytes");
        assert_eq!((err.code, err.reason), (422, "Invalid"));
        assert!(err.message.contains("note: Too long"), "{}", err.message);
    }

    #[test]
    fn dry_run_writes_nothing() {
        let (mut s, pods) = store();
        let nss = s.find("", "v1", "namespaces").expect("namespaces");
        s.create(pods, "ns", json!({"metadata": {"name": "a"}}))
            .expect("create");
        let rv = s.resource_version();
        s.dry_run = true;
        let created = s
            .create(pods, "ns", json!({"metadata": {"name": "b"}}))
            .expect("dry create");
        assert_eq!(created["metadata"]["name"], "b");
        s.delete(pods, "ns", "a", &Preconditions::default())
            .expect("dry delete");
        s.delete(nss, "", "ns", &Preconditions::default())
            .expect("dry namespace delete");
        s.dry_run = false;
        assert_eq!(s.resource_version(), rv);
        assert!(s.get(pods, "ns", "a").is_ok());
        assert!(s.get(nss, "", "ns").is_ok());
        assert_eq!(s.get(pods, "ns", "b").expect_err("not stored").code, 404);
    }
}
