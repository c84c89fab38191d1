//! What the store checks and changes in a body before storing it, as the real server's
//! decoding, validation and admission do: `apiVersion`/`kind`, the namespace, names, labels,
//! Event notes, custom resources' schemas, the namespace's existence, a Secret's `stringData`.

use super::{Store, is_core, meta_str, metadata_mut};
use crate::kinds::KindSpec;
use crate::meta;
use crate::status::ApiError;
use serde_json::{Value, json};

/// The longest `note` an events.k8s.io Event may have, in bytes.
pub const EVENT_NOTE_LIMIT: usize = 1024;

/// What the real server does to a body before storing it: a Secret's `stringData` is folded
/// into `data` (base64), its values winning, and never stored.
pub(super) fn normalize(spec: &KindSpec, obj: &mut Value) -> Result<(), String> {
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

impl Store {
    /// Checks `apiVersion`/`kind` in a body and fills them in when missing.
    pub(super) fn check_type(&self, kind: usize, obj: &mut Value) -> Result<(), ApiError> {
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

    pub(super) fn check_namespace(
        &self,
        kind: usize,
        ns: &str,
        obj: &mut Value,
    ) -> Result<(), ApiError> {
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

    pub(super) fn validate(&self, kind: usize, obj: &Value) -> Result<(), ApiError> {
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

    /// Validates a custom resource against its CRD's structural schema and prunes unknown
    /// fields, as a real server does.
    pub(super) fn check_schema(&self, kind: usize, obj: &mut Value) -> Result<(), ApiError> {
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

    /// `404` for a namespace that does not exist, `403` for one being deleted, as the real
    /// server's namespace lifecycle admission.
    pub(super) fn check_namespace_exists(&self, kind: usize, ns: &str) -> Result<(), ApiError> {
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
}

#[cfg(test)]
mod tests {
    use crate::store::Target;
    use crate::store::tests::store;
    use serde_json::json;

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
}
