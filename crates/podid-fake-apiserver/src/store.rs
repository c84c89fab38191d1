//! Generic JSON object storage with a global `resourceVersion`, an event history window per
//! kind and a broadcast of changes for watches.
//!
//! - `history`: the per-kind history windows watches resume from, and the broadcast;
//! - `admission`: the checks and changes a body goes through before it is stored;
//! - `apply`: server-side apply's field ownership.

mod admission;
mod apply;
mod history;

pub use admission::EVENT_NOTE_LIMIT;
pub use history::{Change, HISTORY_CAP, HISTORY_FRESH, Op, WatchStart};

use admission::normalize;
use history::History;

use crate::kinds::KindSpec;
use crate::meta;
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

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

fn is_core(spec: &KindSpec, plural: &str) -> bool {
    spec.group.is_empty() && spec.plural == plural
}

/// The state behind the server.
#[derive(Debug)]
pub struct Store {
    kinds: Vec<KindSpec>,
    objects: Vec<BTreeMap<Key, Value>>,
    rv: u64,
    /// Per kind: the changes watches may resume from; the broadcast to watches.
    history: History,
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
        let objects = kinds.iter().map(|_| BTreeMap::new()).collect();
        let history = History::new(kinds.len(), history_limit);
        Self {
            kinds,
            objects,
            rv: 0,
            history,
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
        self.history.add_kind();
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
        self.history.set_fresh(fresh);
    }

    /// Drops the event history: watches from any older version get `410 Expired`.
    pub fn compact(&mut self) {
        self.history.compact(self.rv);
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
        self.history.record(change);
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
        let rx = self.history.subscribe();
        let initial = match from {
            Some(rv) => self.history.since(kind, rv)?,
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

    /// A store with namespace `ns`, and the index of Pods.
    pub(super) fn store() -> (Store, usize) {
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
