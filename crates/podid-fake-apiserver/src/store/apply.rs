//! Server-side apply's field ownership.

use super::{Store, meta_str, ns_key};
use crate::status::ApiError;
use serde_json::{Value, json};
use std::collections::BTreeMap;

impl Store {
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
}
