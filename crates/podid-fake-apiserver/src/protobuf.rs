//! Decoding of Kubernetes protobuf request bodies (`application/vnd.kubernetes.protobuf`) for the
//! built-in kinds kubectl sends that way (`create namespace|secret|configmap|serviceaccount|
//! token|role|clusterrole|rolebinding|clusterrolebinding`, `auth can-i`, `auth whoami`): kubectl does not fall back to JSON on `415`, so a server
//! that cannot read these cannot serve kubectl.
//!
//! The envelope is the 4-byte magic `k8s\0` and a `runtime.Unknown` message (`typeMeta` = 1,
//! `raw` = 2); `raw` is the object in protobuf wire format, decoded here with hand-written field
//! tables of the kinds above (the fields of `k8s.io/api` generated.proto files that a client
//! sets). Unknown fields are skipped, as protobuf decoders do.

use serde_json::{Map, Value, json};

/// The prefix of every Kubernetes protobuf body.
const MAGIC: &[u8] = b"k8s\0";

#[derive(Clone, Copy)]
enum Ty {
    Str,
    Bool,
    Int,
    Time,
    Msg(&'static [F]),
    MapStr,
    MapBytes,
    RepStr,
    RepMsg(&'static [F]),
}

type F = (u32, &'static str, Ty);

const OWNER_REF: &[F] = &[
    (5, "apiVersion", Ty::Str),
    (1, "kind", Ty::Str),
    (3, "name", Ty::Str),
    (4, "uid", Ty::Str),
    (6, "controller", Ty::Bool),
    (7, "blockOwnerDeletion", Ty::Bool),
];

const OBJECT_META: &[F] = &[
    (1, "name", Ty::Str),
    (2, "generateName", Ty::Str),
    (3, "namespace", Ty::Str),
    (5, "uid", Ty::Str),
    (6, "resourceVersion", Ty::Str),
    (7, "generation", Ty::Int),
    (8, "creationTimestamp", Ty::Time),
    (11, "labels", Ty::MapStr),
    (12, "annotations", Ty::MapStr),
    (13, "ownerReferences", Ty::RepMsg(OWNER_REF)),
    (14, "finalizers", Ty::RepStr),
];

const OBJECT_REF: &[F] = &[
    (1, "kind", Ty::Str),
    (2, "namespace", Ty::Str),
    (3, "name", Ty::Str),
    (4, "uid", Ty::Str),
    (5, "apiVersion", Ty::Str),
    (6, "resourceVersion", Ty::Str),
    (7, "fieldPath", Ty::Str),
];

const LOCAL_REF: &[F] = &[(1, "name", Ty::Str)];

const NAMESPACE: &[F] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "spec", Ty::Msg(&[(1, "finalizers", Ty::RepStr)])),
];

const SECRET: &[F] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "data", Ty::MapBytes),
    (3, "type", Ty::Str),
    (4, "stringData", Ty::MapStr),
    (5, "immutable", Ty::Bool),
];

const CONFIG_MAP: &[F] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "data", Ty::MapStr),
    (3, "binaryData", Ty::MapBytes),
    (4, "immutable", Ty::Bool),
];

const SERVICE_ACCOUNT: &[F] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "secrets", Ty::RepMsg(OBJECT_REF)),
    (3, "imagePullSecrets", Ty::RepMsg(LOCAL_REF)),
    (4, "automountServiceAccountToken", Ty::Bool),
];

const BOUND_REF: &[F] = &[
    (1, "kind", Ty::Str),
    (2, "apiVersion", Ty::Str),
    (3, "name", Ty::Str),
    (4, "uid", Ty::Str),
];

const TOKEN_REQUEST: &[F] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (
        2,
        "spec",
        Ty::Msg(&[
            (1, "audiences", Ty::RepStr),
            (4, "expirationSeconds", Ty::Int),
            (3, "boundObjectRef", Ty::Msg(BOUND_REF)),
        ]),
    ),
];

const RESOURCE_ATTRIBUTES: &[F] = &[
    (1, "namespace", Ty::Str),
    (2, "verb", Ty::Str),
    (3, "group", Ty::Str),
    (4, "version", Ty::Str),
    (5, "resource", Ty::Str),
    (6, "subresource", Ty::Str),
    (7, "name", Ty::Str),
];

const SSAR: &[F] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (
        2,
        "spec",
        Ty::Msg(&[
            (1, "resourceAttributes", Ty::Msg(RESOURCE_ATTRIBUTES)),
            (
                2,
                "nonResourceAttributes",
                Ty::Msg(&[(1, "path", Ty::Str), (2, "verb", Ty::Str)]),
            ),
        ]),
    ),
];

const POLICY_RULE: &[F] = &[
    (1, "verbs", Ty::RepStr),
    (2, "apiGroups", Ty::RepStr),
    (3, "resources", Ty::RepStr),
    (4, "resourceNames", Ty::RepStr),
    (5, "nonResourceURLs", Ty::RepStr),
];

const ROLE: &[F] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "rules", Ty::RepMsg(POLICY_RULE)),
];

const SUBJECT: &[F] = &[
    (1, "kind", Ty::Str),
    (2, "apiGroup", Ty::Str),
    (3, "name", Ty::Str),
    (4, "namespace", Ty::Str),
];

const BINDING: &[F] = &[
    (1, "metadata", Ty::Msg(OBJECT_META)),
    (2, "subjects", Ty::RepMsg(SUBJECT)),
    (
        3,
        "roleRef",
        Ty::Msg(&[
            (1, "apiGroup", Ty::Str),
            (2, "kind", Ty::Str),
            (3, "name", Ty::Str),
        ]),
    ),
];

const SELF_SUBJECT_REVIEW: &[F] = &[(1, "metadata", Ty::Msg(OBJECT_META))];

fn schema(api_version: &str, kind: &str) -> Option<&'static [F]> {
    Some(match (api_version, kind) {
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "Secret") => SECRET,
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        ("authentication.k8s.io/v1", "TokenRequest") => TOKEN_REQUEST,
        ("authentication.k8s.io/v1", "SelfSubjectReview") => SELF_SUBJECT_REVIEW,
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => SSAR,
        ("rbac.authorization.k8s.io/v1", "Role" | "ClusterRole") => ROLE,
        ("rbac.authorization.k8s.io/v1", "RoleBinding" | "ClusterRoleBinding") => BINDING,
        _ => return None,
    })
}

struct Reader<'a> {
    buf: &'a [u8],
}

enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.buf.split_first().ok_or("truncated varint")?;
            self.buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn field(&mut self) -> Result<Option<(u32, Wire<'a>)>, String> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let tag = self.varint()?;
        let num = u32::try_from(tag >> 3).map_err(|_| "field number too large")?;
        let wire = match tag & 7 {
            0 => Wire::Varint(self.varint()?),
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length too large")?;
                if len > self.buf.len() {
                    return Err("truncated field".into());
                }
                let (b, rest) = self.buf.split_at(len);
                self.buf = rest;
                Wire::Bytes(b)
            }
            1 | 5 => {
                let n = if tag & 7 == 1 { 8 } else { 4 };
                if n > self.buf.len() {
                    return Err("truncated field".into());
                }
                self.buf = &self.buf[n..];
                Wire::Fixed
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok(Some((num, wire)))
    }
}

fn utf8(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "a string field is not UTF-8".to_string())
}

fn map_entry(b: &[u8], bytes: bool) -> Result<(String, Value), String> {
    let mut r = Reader { buf: b };
    let (mut k, mut v) = (String::new(), Value::String(String::new()));
    while let Some((num, wire)) = r.field()? {
        match (num, wire) {
            (1, Wire::Bytes(b)) => k = utf8(b)?,
            (2, Wire::Bytes(b)) if bytes => {
                v = json!(base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    b
                ));
            }
            (2, Wire::Bytes(b)) => v = json!(utf8(b)?),
            _ => {}
        }
    }
    Ok((k, v))
}

fn time(b: &[u8]) -> Result<Value, String> {
    let mut r = Reader { buf: b };
    let mut secs = 0u64;
    while let Some((num, wire)) = r.field()? {
        if let (1, Wire::Varint(v)) = (num, wire) {
            secs = v;
        }
    }
    Ok(json!(crate::meta::rfc3339(secs)))
}

fn message(b: &[u8], fields: &[F]) -> Result<Value, String> {
    let mut out = Map::new();
    let mut r = Reader { buf: b };
    while let Some((num, wire)) = r.field()? {
        let Some(&(_, name, ty)) = fields.iter().find(|f| f.0 == num) else {
            continue;
        };
        let push = |out: &mut Map<String, Value>, v: Value| {
            if let Value::Array(a) = out.entry(name).or_insert_with(|| json!([])) {
                a.push(v);
            }
        };
        match (ty, wire) {
            (Ty::Str, Wire::Bytes(b)) => {
                out.insert(name.into(), json!(utf8(b)?));
            }
            (Ty::Bool, Wire::Varint(v)) => {
                out.insert(name.into(), json!(v != 0));
            }
            (Ty::Int, Wire::Varint(v)) => {
                out.insert(name.into(), json!(v as i64));
            }
            (Ty::Time, Wire::Bytes(b)) => {
                out.insert(name.into(), time(b)?);
            }
            (Ty::Msg(f), Wire::Bytes(b)) => {
                out.insert(name.into(), message(b, f)?);
            }
            (Ty::MapStr | Ty::MapBytes, Wire::Bytes(b)) => {
                let (k, v) = map_entry(b, matches!(ty, Ty::MapBytes))?;
                if let Value::Object(m) = out.entry(name).or_insert_with(|| json!({})) {
                    m.insert(k, v);
                }
            }
            (Ty::RepStr, Wire::Bytes(b)) => push(&mut out, json!(utf8(b)?)),
            (Ty::RepMsg(f), Wire::Bytes(b)) => push(&mut out, message(b, f)?),
            _ => return Err(format!("field {name} has the wrong wire type")),
        }
    }
    Ok(Value::Object(out))
}

/// Whether a body is a Kubernetes protobuf envelope.
pub fn is_protobuf(content_type: &str) -> bool {
    content_type == "application/vnd.kubernetes.protobuf"
}

/// Decodes a protobuf body into the JSON object it stands for. `Ok(None)`: a kind this server
/// does not decode (answered `415`); `Err`: a malformed body (`400`).
pub fn decode(body: &[u8]) -> Result<Option<Value>, String> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or("the protobuf body lacks the k8s magic prefix")?;
    let mut r = Reader { buf: rest };
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    while let Some((num, wire)) = r.field()? {
        match (num, wire) {
            (1, Wire::Bytes(tm)) => {
                let tm = message(tm, &[(1, "apiVersion", Ty::Str), (2, "kind", Ty::Str)])?;
                let s = |f: &str| tm.get(f).and_then(Value::as_str).unwrap_or("").to_string();
                api_version = s("apiVersion");
                kind = s("kind");
            }
            (2, Wire::Bytes(b)) => raw = b,
            _ => {}
        }
    }
    let Some(fields) = schema(&api_version, &kind) else {
        return Ok(None);
    };
    let mut obj = message(raw, fields)?;
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(Some(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(num: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![u8::try_from(num << 3 | 2).expect("small")];
        v.push(u8::try_from(payload.len()).expect("short"));
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_a_secret_envelope() {
        let type_meta = [field(1, b"v1"), field(2, b"Secret")].concat();
        let meta = [field(1, b"s1"), field(3, b"app")].concat();
        let entry = [field(1, b"k"), field(2, &[0xff, 0x00])].concat();
        let raw = [field(1, &meta), field(2, &entry), field(3, b"Opaque")].concat();
        let body = [MAGIC.to_vec(), field(1, &type_meta), field(2, &raw)].concat();
        let v = decode(&body).expect("decodes").expect("known kind");
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s1", "namespace": "app"},
                "data": {"k": "/wA="}, "type": "Opaque"})
        );
        // Unknown kinds are not guessed at, and garbage is an error, not a panic.
        let other = [
            MAGIC.to_vec(),
            field(1, &[field(1, b"v1"), field(2, b"Pod")].concat()),
        ]
        .concat();
        assert_eq!(decode(&other), Ok(None));
        assert!(decode(b"k8s\0\x0a\xff").is_err());
        assert!(decode(b"{}").is_err());
    }
}
